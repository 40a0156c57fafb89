// Host launchers of the CUDA kernels, grouped by op: op <op>'s are defined in kernels/cuda/<op>.cu.
// They take raw device pointers, sizes and a cudaStream_t, and no torch type, so the .cu files
// compile with nvcc alone (CI compiles and inspects them without torch); the dispatcher glue
// (kernels/bindings/<op>.cpp) passes the current stream, so every launch is captured by a CUDA graph. None synchronizes or reads device memory on
// the host. Each returns the launch's error (cudaSuccess, or what cudaGetLastError reports).
//
// Tensors are dense NCHW or, where a launcher takes `channels_last`, dense NHWC (progan/layout.h),
// seen as [N, C, P] with P = H * W; `alpha` points to a 0-dim device
// scalar of the accumulation type (float, double for Float64), read in-kernel so graph replays see
// its current value.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace progan::cuda {

enum class DType : int { Float32 = 0, Float64 = 1, BFloat16 = 2, Float16 = 3 };

// pixel_norm: every buffer dense NCHW, or dense NHWC with channels_last (progan/layout.h).
cudaError_t pixel_norm_forward(DType dt, const void* x, void* y, int64_t n, int64_t c, int64_t p, double eps,
                               bool channels_last, cudaStream_t stream);
cudaError_t pixel_norm_backward(DType dt, const void* dy, const void* x, void* dx, int64_t n, int64_t c, int64_t p,
                                double eps, bool channels_last, cudaStream_t stream);

// conv_act's epilogue: y = lrelu(conv * scale + bias) [then pixel norm, r = per-pixel scale,
// accumulation type]. conv, y, dy and g dense NCHW, or dense NHWC with channels_last; r [N, P].
cudaError_t conv_epilogue_forward(DType dt, const void* conv, void* y, const void* bias, void* r, int64_t n,
                                  int64_t c, int64_t p, double scale, bool activation, bool pixel_norm,
                                  bool channels_last, cudaStream_t stream);
// g = lrelu'(y) * pixel_norm'(dy) (written when activation or pixel_norm), and bias_part[b, c] =
// the sum of g over block b's pixels (accumulation type), for conv_epilogue_num_blocks(n, p) blocks.
int64_t conv_epilogue_num_blocks(int64_t n, int64_t p);
cudaError_t conv_epilogue_backward(DType dt, const void* dy, const void* y, const void* r, void* g, void* bias_part,
                                   int64_t n, int64_t c, int64_t p, bool activation, bool pixel_norm,
                                   bool channels_last, cudaStream_t stream);

// fade_in and fade_reals: [n, c, hl, wl] is the low-resolution shape; every tensor dense NCHW, or
// dense NHWC when channels_last.
cudaError_t fade_in_forward(DType dt, const void* low, const void* high, const void* alpha, void* out, int64_t n,
                            int64_t c, int64_t hl, int64_t wl, bool channels_last, cudaStream_t stream);
cudaError_t fade_in_backward(DType dt, const void* grad, const void* alpha, void* d_low, void* d_high, int64_t n,
                             int64_t c, int64_t hl, int64_t wl, bool channels_last, cudaStream_t stream);
cudaError_t fade_reals(DType dt, const void* x, const void* alpha, void* out, int64_t n, int64_t c, int64_t hl,
                       int64_t wl, bool channels_last, cudaStream_t stream);

// blend: elementwise, so any layout the three tensors share.
cudaError_t blend_forward(DType dt, const void* old_, const void* new_, const void* alpha, void* out, int64_t numel,
                          cudaStream_t stream);
cudaError_t blend_backward(DType dt, const void* grad, const void* alpha, void* d_old, void* d_new, int64_t numel,
                           cudaStream_t stream);

// downsample2x: [n, c, h, w] is the input's shape, both tensors dense NCHW, or dense NHWC when
// channels_last; an odd last row/column of the input is ignored (forward) / gets zero (backward).
cudaError_t downsample2x_forward(DType dt, const void* x, void* y, int64_t n, int64_t c, int64_t h, int64_t w,
                                 bool channels_last, cudaStream_t stream);
cudaError_t downsample2x_backward(DType dt, const void* grad, void* dx, int64_t n, int64_t c, int64_t h, int64_t w,
                                  bool channels_last, cudaStream_t stream);

// minibatch_stddev: group members are samples g * M + m; F = C * P features. `part` is scratch of
// minibatch_stddev_part_count(m, f) accumulation-type values, `gs` of m values. x, dx, out and grad
// all dense NCHW or all dense NHWC (channels_last: the stat value interleaved after each pixel's C;
// cudaErrorInvalidValue for an NHWC sample of 2^32 features or more).
int64_t minibatch_stddev_part_count(int64_t m, int64_t f);
cudaError_t minibatch_stddev_forward(DType dt, const void* x, void* out, void* part, int64_t group, int64_t m,
                                     int64_t f, int64_t p, double eps, bool channels_last, cudaStream_t stream);
cudaError_t minibatch_stddev_backward(DType dt, const void* grad, const void* x, void* gs, void* dx, int64_t group,
                                      int64_t m, int64_t f, int64_t p, double eps, bool channels_last,
                                      cudaStream_t stream);

}  // namespace progan::cuda
