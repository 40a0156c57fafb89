// The equalized-LR conv's epilogue on the conv output (cuDNN's conv with the unscaled weight):
// y = lrelu(conv * scale + bias) [then pixel norm], and its backward with the bias gradient.
//
// Layouts (progan/layout.h): conv, y, dy and g are dense NCHW or dense NHWC (channels_last), and
// the kernels address them through the [N, C, P] strides s = (s.n, s.c, s.p); r ([N, P]) and
// bias_part are the same in both.
//
// Without pixel norm the forward is elementwise (a grid-stride loop over memory order, channel =
// (i / s.c) % C: (i / P) % C in NCHW, i % C in NHWC). With pixel norm, and in the backward, one
// thread owns a pixel (n, p) and walks its C channels: in NCHW consecutive threads take
// consecutive pixels, so every load is coalesced; in NHWC a thread walks its pixel's contiguous
// channels (correct, not coalesced across threads). NHWC with 32 channels or more instead gives
// each pixel a warp, whose lanes read consecutive channels and reduce with shuffles: the forward
// with pixel norm, and the backward up to kWarpMaxChannels channels. The backward's bias gradient
// is reduced per block and channel into bias_part[block, c] (no atomics: deterministic); the glue
// sums the few rows.
#include "common.cuh"

namespace progan::cuda {
namespace {
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// NHWC takes the warp-per-pixel kernels from this many channels on (the backward up to
// kWarpMaxChannels: its per-warp bias sums, kWarps rows of that many accumulators, are in shared
// memory: 16 KB for float, 32 KB for double).
constexpr int64_t kWarpMinChannels = 32;
constexpr int kWarpMaxChannels = 512;

template <typename T>
__global__ void __launch_bounds__(kThreads) epilogue_pointwise_kernel(const T* __restrict__ conv, T* __restrict__ y,
                                                                      const T* __restrict__ bias, int64_t numel,
                                                                      int64_t c, int64_t channel_stride,
                                                                      acc_t<T> scale, bool activation) {
  using A = acc_t<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x) {
    A v = fma_(to_acc(conv[i]), scale, bias ? to_acc(bias[(i / channel_stride) % c]) : A(0));
    y[i] = from_acc<T>(activation ? lrelu(v) : v);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) epilogue_pixel_norm_kernel(const T* __restrict__ conv, T* __restrict__ y,
                                                                       const T* __restrict__ bias,
                                                                       acc_t<T>* __restrict__ r, int64_t n, int64_t c,
                                                                       int64_t p, NCPStrides s, acc_t<T> scale,
                                                                       bool activation) {
  using A = acc_t<T>;
  const A inv_c = A(1) / A(c);
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < n * p; q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t base = (q / p) * s.n + (q % p) * s.p;
    A sum = A(0);
    for (int64_t ch = 0; ch < c; ++ch) {
      A v = fma_(to_acc(conv[base + ch * s.c]), scale, bias ? to_acc(bias[ch]) : A(0));
      if (activation) v = lrelu(v);
      sum += v * v;
    }
    const A rs = rsqrt_(sum * inv_c + A(kPixelNormEps));
    r[q] = rs;
    for (int64_t ch = 0; ch < c; ++ch) {
      A v = fma_(to_acc(conv[base + ch * s.c]), scale, bias ? to_acc(bias[ch]) : A(0));
      if (activation) v = lrelu(v);
      y[base + ch * s.c] = from_acc<T>(v * rs);
    }
  }
}

// NHWC with pixel norm, one warp per pixel: pixel q's channels are [q * c, q * c + c). The loop over
// pixels is uniform across a warp, so every lane reaches every shuffle.
template <typename T>
__global__ void __launch_bounds__(kThreads) epilogue_pixel_norm_nhwc_kernel(const T* __restrict__ conv,
                                                                            T* __restrict__ y,
                                                                            const T* __restrict__ bias,
                                                                            acc_t<T>* __restrict__ r, int64_t pixels,
                                                                            int64_t c, acc_t<T> scale,
                                                                            bool activation) {
  using A = acc_t<T>;
  const A inv_c = A(1) / A(c);
  const int lane = threadIdx.x & 31;
  for (int64_t q = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5); q < pixels; q += int64_t(gridDim.x) * kWarps) {
    const int64_t base = q * c;
    A sum = A(0);
    for (int64_t ch = lane; ch < c; ch += 32) {
      A v = fma_(to_acc(conv[base + ch]), scale, bias ? to_acc(bias[ch]) : A(0));
      if (activation) v = lrelu(v);
      sum += v * v;
    }
    const A rs = rsqrt_(warp_sum(sum) * inv_c + A(kPixelNormEps));
    if (lane == 0) r[q] = rs;
    for (int64_t ch = lane; ch < c; ch += 32) {
      A v = fma_(to_acc(conv[base + ch]), scale, bias ? to_acc(bias[ch]) : A(0));
      if (activation) v = lrelu(v);
      y[base + ch] = from_acc<T>(v * rs);
    }
  }
}

// One thread per pixel q of the flattened (n, p) range; block b covers pixels [b * kThreads, ...).
template <typename T>
__global__ void __launch_bounds__(kThreads) epilogue_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ y,
                                                                const acc_t<T>* __restrict__ r, T* __restrict__ g,
                                                                acc_t<T>* __restrict__ bias_part, int64_t n, int64_t c,
                                                                int64_t p, NCPStrides s, bool activation,
                                                                bool pixel_norm) {
  using A = acc_t<T>;
  __shared__ A scratch[32];
  const int64_t q = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  const bool valid = q < n * p;
  const int64_t base = valid ? (q / p) * s.n + (q % p) * s.p : 0;
  A rs = A(0), mean_dy_y = A(0);
  if (valid && pixel_norm) {
    A sum = A(0);
    for (int64_t ch = 0; ch < c; ++ch) sum += to_acc(dy[base + ch * s.c]) * to_acc(y[base + ch * s.c]);
    rs = r[q];
    mean_dy_y = sum / A(c);
  }
  for (int64_t ch = 0; ch < c; ++ch) {
    A v = A(0);
    if (valid) {
      const int64_t i = base + ch * s.c;
      v = to_acc(dy[i]);
      if (activation || pixel_norm) {
        const A yv = to_acc(y[i]);
        if (pixel_norm) v = pixel_norm_grad(v, yv, rs, mean_dy_y);
        if (activation) v = lrelu_grad(v, yv);
        g[i] = from_acc<T>(v);
      }
    }
    const A total = block_sum(v, scratch);  // every thread reaches this: `valid` only masks values
    if (threadIdx.x == 0) bias_part[blockIdx.x * c + ch] = total;
  }
}

// NHWC backward, one warp per pixel. Block b covers pixels [b * kThreads, b * kThreads + kThreads)
// as the thread-per-pixel kernel's does (one bias_part row per block); warp w takes its 32 of them
// one at a time, its lanes over the pixel's contiguous channels, and adds g into its own row of
// `sums` (each entry owned by one lane: no races). After a barrier the block adds the kWarps rows in
// a fixed order into bias_part[b, ch].
template <typename T>
__global__ void __launch_bounds__(kThreads) epilogue_bwd_nhwc_kernel(const T* __restrict__ dy,
                                                                     const T* __restrict__ y,
                                                                     const acc_t<T>* __restrict__ r,
                                                                     T* __restrict__ g,
                                                                     acc_t<T>* __restrict__ bias_part, int64_t pixels,
                                                                     int64_t c, bool activation, bool pixel_norm) {
  using A = acc_t<T>;
  __shared__ A sums[kWarps][kWarpMaxChannels];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t ch = lane; ch < c; ch += 32) sums[warp][ch] = A(0);
  const int64_t first = blockIdx.x * int64_t(kThreads) + warp * 32;
  for (int i = 0; i < 32 && first + i < pixels; ++i) {  // uniform across the warp
    const int64_t base = (first + i) * c;
    A rs = A(0), mean_dy_y = A(0);
    if (pixel_norm) {
      A s = A(0);
      for (int64_t ch = lane; ch < c; ch += 32) s += to_acc(dy[base + ch]) * to_acc(y[base + ch]);
      mean_dy_y = warp_sum(s) / A(c);
      rs = r[first + i];
    }
    for (int64_t ch = lane; ch < c; ch += 32) {
      A v = to_acc(dy[base + ch]);
      if (activation || pixel_norm) {
        const A yv = to_acc(y[base + ch]);
        if (pixel_norm) v = pixel_norm_grad(v, yv, rs, mean_dy_y);
        if (activation) v = lrelu_grad(v, yv);
        g[base + ch] = from_acc<T>(v);
      }
      sums[warp][ch] += v;
    }
  }
  __syncthreads();
  for (int64_t ch = threadIdx.x; ch < c; ch += kThreads) {
    A total = A(0);
    for (int w = 0; w < kWarps; ++w) total += sums[w][ch];
    bias_part[blockIdx.x * c + ch] = total;
  }
}
}  // namespace

int64_t conv_epilogue_num_blocks(int64_t n, int64_t p) { return ceil_div(n * p, kThreads); }

cudaError_t conv_epilogue_forward(DType dt, const void* conv, void* y, const void* bias, void* r, int64_t n,
                                  int64_t c, int64_t p, double scale, bool activation, bool pixel_norm,
                                  bool channels_last, cudaStream_t stream) {
  return PROGAN_CUDA_DISPATCH(dt, [&] {
    using A = acc_t<scalar_t>;
    const auto* in = static_cast<const scalar_t*>(conv);
    auto* out = static_cast<scalar_t*>(y);
    const auto* b = static_cast<const scalar_t*>(bias);
    if (pixel_norm && channels_last && c >= kWarpMinChannels) {
      epilogue_pixel_norm_nhwc_kernel<scalar_t><<<grid_for(n * p, kWarps), kThreads, 0, stream>>>(
          in, out, b, static_cast<A*>(r), n * p, c, A(scale), activation);
    } else if (pixel_norm) {
      epilogue_pixel_norm_kernel<scalar_t><<<grid_for(n * p, kThreads), kThreads, 0, stream>>>(
          in, out, b, static_cast<A*>(r), n, c, p, ncp_strides(c, p, channels_last), A(scale), activation);
    } else {
      epilogue_pointwise_kernel<scalar_t><<<grid_for(n * c * p, kThreads), kThreads, 0, stream>>>(
          in, out, b, n * c * p, c, ncp_strides(c, p, channels_last).c, A(scale), activation);
    }
  });
}

cudaError_t conv_epilogue_backward(DType dt, const void* dy, const void* y, const void* r, void* g, void* bias_part,
                                   int64_t n, int64_t c, int64_t p, bool activation, bool pixel_norm,
                                   bool channels_last, cudaStream_t stream) {
  return PROGAN_CUDA_DISPATCH(dt, [&] {
    using A = acc_t<scalar_t>;
    const auto blocks = static_cast<unsigned>(conv_epilogue_num_blocks(n, p));
    if (channels_last && c >= kWarpMinChannels && c <= kWarpMaxChannels) {
      epilogue_bwd_nhwc_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          static_cast<const scalar_t*>(dy), static_cast<const scalar_t*>(y), static_cast<const A*>(r),
          static_cast<scalar_t*>(g), static_cast<A*>(bias_part), n * p, c, activation, pixel_norm);
      return;
    }
    epilogue_bwd_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(dy), static_cast<const scalar_t*>(y), static_cast<const A*>(r),
        static_cast<scalar_t*>(g), static_cast<A*>(bias_part), n, c, p, ncp_strides(c, p, channels_last), activation,
        pixel_norm);
  });
}

}  // namespace progan::cuda
